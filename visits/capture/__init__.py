"""Getting a recording in: uploads, recordings made in the browser, decoding, playback."""
