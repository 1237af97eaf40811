import sys

from score_train.commands import main

sys.exit(main())
