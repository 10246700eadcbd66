from draftsmith.eval.cli import main

main()
