"""python -m msfm"""

from msfm.cli import main

main()
