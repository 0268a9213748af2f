from aioproj.cli import main

main()
