"""The first instruction of `fastmesh run`: catch the signals a process manager may send
before the service can act on them. Imports nothing but `signal`, so the window in which a
signal still has its default (fatal) action is only the interpreter's own start-up."""
import signal


def catch_signals(hup: bool = True) -> list:
    """Until the process can act on them, a HUP, TERM or INT is remembered (not fatal) and
    acted on once there is something to act on. A generation keeps SIGHUP ignored
    (hup=False): hot restarts are the main process's to run."""
    pending: list = []

    def remember(signum, frame):
        pending.append(signum)
    for sig in ((signal.SIGHUP,) if hup else ()) + (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, remember)
    return pending
