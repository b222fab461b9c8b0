"""Only the compiled part; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dotmesh.fs._scan", ["src/dotmesh/fs/_scan.c"],
                             extra_compile_args=["-O2"]),
                   Extension("dotmesh.fs._extents", ["src/dotmesh/fs/_extents.c"],
                             extra_compile_args=["-O2"]),
                   Extension("dotmesh.fs._reads", ["src/dotmesh/fs/_reads.c"],
                             extra_compile_args=["-O2"])])
