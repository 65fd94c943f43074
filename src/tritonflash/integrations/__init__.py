"""Integrations of tritonflash with other libraries.

Each submodule imports its library only when one of its functions is called, so importing it
costs nothing when that library is absent (``tritonflash.integrations.transformers`` needs
``pip install "tritonflash[hf]"``).
"""
