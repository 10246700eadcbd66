from draftsmith.data.cli import main

main()
