from bloger_cli.cli import main

main()
