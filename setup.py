"""Build glue for the compiled core: cython_ext/ becomes the module vfe._engine."""
from setuptools import Extension, setup
from Cython.Build import cythonize

extensions = [
    Extension(
        "vfe._engine",
        ["cython_ext/engine.pyx"],
        include_dirs=["cython_ext", "cython_ext/includes"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["cython_ext", "cython_ext/includes"],
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    )
)
