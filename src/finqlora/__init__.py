"""finqlora: finance news database -> instruction dataset -> QLoRA fine-tune -> evaluation -> API.

The command line (`finqlora ...`) is a thin layer over the modules of this package; every
stage can be imported and called from Python.
"""

__version__ = "0.1.0"
