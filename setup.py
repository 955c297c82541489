"""Only here to ship the repository's csrc/ inside the wheel as lpips_fast/csrc/.

Everything else is in pyproject.toml. The C++ kernels are built just in time on first CPU use
(see lpips_fast/ops/_cpu.py), so the wheel carries the source, not a binary.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads csrc/ from the repository
        target = Path(self.build_lib) / "lpips_fast" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(__file__).parent.joinpath("csrc").glob("*.cpp")):
            shutil.copy2(src, target / src.name)


setup(cmdclass={"build_py": BuildPyWithCsrc})
