"""Reading rasters window by window (`raster`) and reaching object stores (`remote`)."""
