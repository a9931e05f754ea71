import sys

from dino_scale.slurm.submit import main

if __name__ == "__main__":
    sys.exit(main())
