"""Everything ckpt-ir knows about Megatron-Core's on-disk forms, in one package.

- :mod:`~ckpt_ir.megatron.keys`: state-dict key tables (local and Transformer-Engine norm names),
  rank and iteration directory names, grouped-GEMM experts, LoRA keys, :class:`LocalName`;
- :mod:`~ckpt_ir.megatron.args`: the ``args`` a rank file carries, written from a ModelSpec and
  Layout and read back;
- :mod:`~ckpt_ir.megatron.infer`: which HF family plain Megatron-LM args describe;
- :mod:`~ckpt_ir.megatron.ranks`: which keys each rank file holds, in writing order;
- :mod:`~ckpt_ir.megatron.distopt`: the distributed optimizer's flat-buffer layout;
- :mod:`~ckpt_ir.megatron.integrity`: the ``integrity.json`` manifest of a ``torch_dist`` iteration;
- :mod:`~ckpt_ir.megatron.lift`: the end both Megatron frontends share.

Frontends (``torch``, ``torch_dist``) and backends use it; it uses the IR and the family tables,
never a frontend or backend.
"""
