"""python -m pretrain.checkpoint to-universal CHECKPOINT_FOLDER (see pretrain.checkpoint.deepspeed)."""

import sys

from .deepspeed import main

sys.exit(main())
