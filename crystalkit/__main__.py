from crystalkit.cli import main

main()
