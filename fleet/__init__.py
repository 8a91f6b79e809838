"""The operator's command line: ``fleet up`` runs a local fleet, ``fleet model init``
writes the tiny model, and the embedded servers the local fleet starts."""
