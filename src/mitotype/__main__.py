from mitotype.cli import main

main()
