from ckpt_ir.commands.cli import run

run()
