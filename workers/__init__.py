"""The worker side of psrv: the protocol client and the training loop of one worker process."""
