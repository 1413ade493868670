"""The models gru-deploy deploys: the tutorial's GRU cell and classifier and their stream and lengths forms."""
