"""`python -m lorastudio.cli ...` is the `lorastudio` command."""

import sys

from .main import main

sys.exit(main())
