"""`python -m gru_deploy` runs the CLI."""

from gru_deploy.cli import main

if __name__ == "__main__":
    main()
