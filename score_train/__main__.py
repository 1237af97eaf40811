import sys

from score_train.cli import train_main

sys.exit(train_main())
