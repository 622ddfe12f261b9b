"""Build hook (everything else is in pyproject.toml): the wheel also carries the course files that live outside the
package, so that a pip-installed course (Colab) finds them: the stored benchmark results that notebooks show and
the pristine exercise notebooks that `python -m minillm.course grade` grades against. They are copied into
`minillm/_repo/` with their repository paths; `minillm.repo.repo_path` looks in the checkout first, then there."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = {"benchmarks/results": ("*.json", "*.png"), "exercises": ("*.ipynb",)}


class BuildPyWithCourseFiles(build_py):
    def run(self):
        super().run()
        for folder, patterns in SHIPPED.items():
            for pattern in patterns:
                for source in sorted(Path(folder).glob(pattern)):
                    target = Path(self.build_lib) / "minillm" / "_repo" / folder / source.name
                    self.mkpath(str(target.parent))
                    self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildPyWithCourseFiles})
