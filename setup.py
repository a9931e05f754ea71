"""Build glue for the native multi-scale deformable attention op (see ops/)."""

from setuptools import setup

setup()
