from lossgeo.cli import main

main()
