"""`python -m lorastudio.cli ...` is the `lorastudio` command."""

import sys

from .commands import main

sys.exit(main())
