import sys

from ckpt_ir.cli import main

sys.exit(main())
