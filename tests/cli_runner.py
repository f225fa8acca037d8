"""Running `handprop` in the test's own process: one helper for every test file that needs it."""

from handprop.cli import main


def run_main(argv, capsys):
    """(exit status, stdout, stderr) of `handprop argv` in this process; argparse's exits are a status too."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:                 # argparse rejects a flag by exiting
        status = e.code
    printed = capsys.readouterr()
    return status, printed.out, printed.err
