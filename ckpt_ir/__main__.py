from ckpt_ir.cli import run

run()
