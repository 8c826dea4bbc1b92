"""Build hook: ship ``schemas/`` and ``spark-conf/`` inside the package.

The metadata is in pyproject.toml. A wheel carries only packages, so build_py copies the two
top-level folders (the source of truth) into ``sparkdl/_data/`` of the build; the package finds
them there when installed from a wheel and at the top level in a checkout (sparkdl._resources).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA_FOLDERS = ("schemas", "spark-conf")


class build_py_with_data(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for name in DATA_FOLDERS:
            target = Path(self.build_lib) / "sparkdl" / "_data" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(root / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": build_py_with_data})
