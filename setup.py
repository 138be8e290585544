"""Only what setup.cfg cannot say: ship kong_pdk_fix.pth (and .start) at the wheel's root.

site.py runs a .pth file only from a site directory itself, never from inside a package, so
build_py copies both files next to the package in build_lib (the wheel's root, which pip
installs into site-packages). The idea is rapidsai/rapids-dask-dependency's setup.py.
`pip install -e .` does not run this: an editable install has no .pth of ours, which is why
tests/test_activation.py installs a built wheel into a fresh venv.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

START_UP_FILES = (
    "kong_pdk_fix.pth",  # run by site.py at every interpreter start
    "kong_pdk_fix.start",  # the same for Python 3.15+ start-up entry points (PEP 829)
)


class build_py_with_start_up_files(build_py):
    def run(self):
        super().run()
        for name in START_UP_FILES:
            source = os.path.join("kong_pdk_fix", name)
            self.copy_file(source, os.path.join(self.build_lib, name), preserve_mode=0)


setup(cmdclass={"build_py": build_py_with_start_up_files})
