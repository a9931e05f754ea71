import sys

from dino_scale.slurm.submit import main

sys.exit(main())
