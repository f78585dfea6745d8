"""`python -m service`: the server's command line, the same as `python app.py` and `bert-serving-start`."""
import sys

from app import main

if __name__ == "__main__":
    sys.exit(main())
