"""The parts of bench/device_check.py, one module per figure (P1 ray_train, P2 sam, P3 tune,
P4 method_steps, P6 speed_options) plus their shared sizes. Modules that use Ray import it
themselves: Ray stays inside bench/ and semiseg.distributed."""
