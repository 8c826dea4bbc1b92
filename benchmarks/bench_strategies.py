"""Every training strategy on the flights table: 2 ranks (local mode), the same model, batch and
budget, once with equal ranks and once with rank 1 slowed 2x (``straggler`` test hook).

For each run: samples/s (training samples over the wall time from the first to the last step),
the time until the all-reduce run's final validation AUC was reached (validation runs at each
epoch end, so this is an epoch-end time), the final AUC, and the strategy's own bytes put on the
wire per training sample (counted by each strategy: gradient or parameter all-reduces as ring
traffic, parameter-server pushes and replies as sent).

Needs the flights tables: ``python jobs/etl.py --lakehouse <lake>`` once.

    .venv/bin/python benchmarks/bench_strategies.py --lakehouse <lake> [--epochs 3] [--batch 256]

Goals (issue 10): local_sgd (H=8) >= 1.3x all-reduce's samples/s with AUC within 0.005; with the
straggler, ssp and async reach the target AUC in <= 0.65x all-reduce's time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

STRATEGIES = {
    "allreduce": {},
    "local_sgd": {"strategy": "local_sgd", "sync_every": 8},
    "easgd": {"strategy": "easgd", "sync_every": 4, "easgd_alpha": 0.4},
    "bmuf": {"strategy": "bmuf", "sync_every": 8, "bmuf_block_momentum": 0.5},
    "ssp": {"strategy": "ssp", "staleness": 3},
    "async": {"strategy": "async"},
    "fedavg": {"strategy": "fedavg", "fedavg_client_column": "origin", "fedavg_local_epochs": 1},
}


def run(lake: str, name: str, extra: dict, *, epochs: int, batch: int, straggler: dict | None) -> dict:
    from sparkdl import _fs
    from sparkdl.train import TrainConfig, fit

    cfg = TrainConfig(lakehouse=lake, train_table="flights_train", valid_table="flights_valid", model="flights_mlp",
                      num_ranks=2, local_mode=True, epochs=epochs, batch_size=batch, lr=2e-3, optimizer="adamw",
                      checkpoint_every=10_000, straggler=straggler, **extra)
    result = fit(cfg, progress=False)
    steps = [json.loads(line) for line in _fs.read_text(result.step_metrics).splitlines() if line.strip()]
    t0 = steps[0]["time"]
    # Samples of the first step are left out: the clock starts when it ends.
    samples = 2 * (steps[-1]["rank_samples"] - steps[0]["rank_samples"])
    wall = steps[-1]["time"] - t0
    ends = {}
    for h in result.history:
        ends[h["epoch"]] = max(s["time"] for s in steps if s["step"] <= h["step"]) - t0
    bytes_per_sample = steps[-1]["comm_bytes"] / max(1, steps[-1]["rank_samples"])
    return {"name": name, "samples_per_s": samples / wall, "auc": [h["val_auc"] for h in result.history],
            "epoch_end_s": [ends[h["epoch"]] for h in result.history], "wall_s": wall,
            "bytes_per_sample": bytes_per_sample, "steps": result.steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lakehouse", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--only", nargs="*", default=list(STRATEGIES))
    p.add_argument("--factor", type=float, default=2.0, help="straggler slow-down of rank 1")
    args = p.parse_args()
    lake = os.path.abspath(args.lakehouse)
    for label, straggler in (("equal ranks", None), (f"rank 1 slowed {args.factor:g}x", {"rank": 1,
                                                                                         "factor": args.factor})):
        rows = [run(lake, n, STRATEGIES[n], epochs=args.epochs, batch=args.batch, straggler=straggler)
                for n in args.only]
        base = rows[0]
        target = base["auc"][-1]
        print(f"\n{label}: 2 ranks, batch {args.batch}/rank, {args.epochs} epochs, target AUC {target:.4f} "
              f"(all-reduce's final)")
        print(f"{'strategy':>10} {'samples/s':>10} {'vs AR':>6} {'to target':>10} {'vs AR':>6} {'final AUC':>9} "
              f"{'bytes/sample':>12}")
        base_t = next((t for a, t in zip(base["auc"], base["epoch_end_s"]) if a >= target), None)
        for r in rows:
            t = next((t for a, t in zip(r["auc"], r["epoch_end_s"]) if a >= target), None)
            bps = r["bytes_per_sample"]
            print(f"{r['name']:>10} {r['samples_per_s']:>10,.0f} {r['samples_per_s'] / base['samples_per_s']:>5.2f}x "
                  f"{(f'{t:.1f}s' if t is not None else 'not reached'):>10} "
                  f"{(f'{t / base_t:.2f}x' if t is not None and base_t else '-'):>6} {r['auc'][-1]:>9.4f} "
                  f"{(f'{bps:,.0f}' if bps is not None else '-'):>12}", flush=True)
        print("per-epoch AUC: " + "; ".join(f"{r['name']} {[round(a, 4) for a in r['auc']]}" for r in rows))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
