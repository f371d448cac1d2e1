"""Adapters of mlkv stores to training frameworks.

``mlkv.frameworks.torch`` holds the PyTorch modules. Importing this package imports no
framework; each adapter imports its framework when it is itself imported.
"""
