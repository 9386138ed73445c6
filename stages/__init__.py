"""The four analysis stages, registered in order as each one lands."""
