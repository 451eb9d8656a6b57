"""Planning a layout before launching it (k2m-plan): memory terms per pipeline rank."""
