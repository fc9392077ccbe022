"""python -m dmd2"""

from .cli import main

main()
