from hemat.cli import main

main()
