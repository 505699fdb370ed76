"""One module per DVC stage; each ``main()`` reads ``params.yaml``, takes paths as arguments, writes its outputs."""
