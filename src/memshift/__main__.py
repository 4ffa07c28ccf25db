from memshift.cli import main

main()
