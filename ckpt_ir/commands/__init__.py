"""The ``ckpt-ir`` command line: the parser and driver (:mod:`~ckpt_ir.commands.cli`), the flags
shared by the converting commands (:mod:`~ckpt_ir.commands.common`), and one module per command
that has its own (``plan``, ``verify``, ``diff``, ``demo``, and ``convert-ckpt``, the MindSpeed-LLM
drop-in).  The library's face is :mod:`ckpt_ir.api`; commands call it."""
