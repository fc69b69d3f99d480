"""What each API process runs in the background: the broker link (method calls and
publishes), the cloud-to-device dispatcher, the job runner and the live stream's hub."""
