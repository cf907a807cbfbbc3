"""Backends lower a Checkpoint to files.  Each backend only *plans* (which files, which tensors in
each, from metadata alone); :mod:`ckpt_ir.backends.execute` streams the plan to disk."""
