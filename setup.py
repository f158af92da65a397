"""Build hook: wheels carry gRPC stubs generated from protos/ by service/protogen.py (grpcio-tools)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location("protogen", ROOT / "service" / "protogen.py")
        protogen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(protogen)
        protogen.generate(ROOT / "protos", Path(self.build_lib) / "service" / "_proto")


setup(cmdclass={"build_py": BuildWithStubs})
