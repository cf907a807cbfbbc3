"""Built-in passes.  Importing this package registers them; ``ckpt-ir passes`` lists them."""

from ckpt_ir.passes import carry, cast, fusion, layers, lora, parallel, vocab  # noqa: F401
from ckpt_ir.passes.manager import (  # noqa: F401
    Allowed,
    Instrumentation,
    Option,
    Pass,
    PassManager,
    Pipeline,
    at_least,
    one_of,
    option,
    parse_pipeline,
    register_pass,
    registry,
)
