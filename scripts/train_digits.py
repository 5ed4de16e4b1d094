"""Train the shipped digits networks (≤ 15 minutes on 2 CPU cores); see diffsolve.nets.train."""

from diffsolve.nets.train import main

if __name__ == "__main__":
    main()
