/* The MPI benchmark of integration/bench-mpi (built into mpi.sqsh as mpibench-openmpi,
 * and on the host for the bare runs): point-to-point latency and bandwidth between ranks 0
 * and 1, and broadcast latency over all ranks, for message sizes from 0 bytes to 4 MiB, in
 * the manner of the OSU micro-benchmarks (warm-up iterations first; fewer iterations for
 * large messages).
 *
 * Output, one line per measurement:
 *   latency SIZE USEC      half the round trip of a blocking ping-pong
 *   bandwidth SIZE MB/S    rank 0 posts a window of non-blocking sends, rank 1 answers
 *                          the window with one zero-byte message
 *   bcast SIZE USEC        mean time of MPI_Bcast from rank 0, the slowest rank's
 * Usage: mpibench [latency|bandwidth|bcast]... (default: all three) */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SIZE (4 << 20)
#define WINDOW 64

static int iterations(long size, int small, int large)
{
    return size > 65536 ? large : small;
}

static void latency(int rank, char *buf)
{
    for (long size = 0; size <= MAX_SIZE; size = size ? size * 8 : 1) {
        int iters = iterations(size, 1000, 40), warm = iters / 10;
        double start = 0;
        MPI_Barrier(MPI_COMM_WORLD);
        for (int i = 0; i < iters + warm; i++) {
            if (i == warm)
                start = MPI_Wtime();
            if (rank == 0) {
                MPI_Send(buf, (int)size, MPI_CHAR, 1, 1, MPI_COMM_WORLD);
                MPI_Recv(buf, (int)size, MPI_CHAR, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else if (rank == 1) {
                MPI_Recv(buf, (int)size, MPI_CHAR, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                MPI_Send(buf, (int)size, MPI_CHAR, 0, 1, MPI_COMM_WORLD);
            }
        }
        if (rank == 0)
            printf("latency %ld %.3f\n", size, (MPI_Wtime() - start) * 1e6 / (2.0 * iters));
    }
}

static void bandwidth(int rank, char *buf)
{
    MPI_Request req[WINDOW];
    for (long size = 1; size <= MAX_SIZE; size *= 8) {
        int iters = iterations(size, 100, 10), warm = iters / 10;
        double start = 0;
        MPI_Barrier(MPI_COMM_WORLD);
        for (int i = 0; i < iters + warm; i++) {
            if (i == warm)
                start = MPI_Wtime();
            if (rank == 0) {
                for (int w = 0; w < WINDOW; w++)
                    MPI_Isend(buf, (int)size, MPI_CHAR, 1, 2, MPI_COMM_WORLD, &req[w]);
                MPI_Waitall(WINDOW, req, MPI_STATUSES_IGNORE);
                MPI_Recv(buf, 0, MPI_CHAR, 1, 3, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else if (rank == 1) {
                for (int w = 0; w < WINDOW; w++)
                    MPI_Irecv(buf, (int)size, MPI_CHAR, 0, 2, MPI_COMM_WORLD, &req[w]);
                MPI_Waitall(WINDOW, req, MPI_STATUSES_IGNORE);
                MPI_Send(buf, 0, MPI_CHAR, 0, 3, MPI_COMM_WORLD);
            }
        }
        if (rank == 0) {
            double secs = MPI_Wtime() - start;
            printf("bandwidth %ld %.1f\n", size, (double)size * WINDOW * iters / secs / 1e6);
        }
    }
}

static void bcast(int rank, char *buf)
{
    for (long size = 1; size <= MAX_SIZE; size *= 8) {
        int iters = iterations(size, 500, 20), warm = iters / 10;
        double start = 0, mine, slowest;
        MPI_Barrier(MPI_COMM_WORLD);
        for (int i = 0; i < iters + warm; i++) {
            if (i == warm)
                start = MPI_Wtime();
            MPI_Bcast(buf, (int)size, MPI_CHAR, 0, MPI_COMM_WORLD);
        }
        mine = (MPI_Wtime() - start) * 1e6 / iters;
        MPI_Reduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        if (rank == 0)
            printf("bcast %ld %.3f\n", size, slowest);
    }
}

int main(int argc, char **argv)
{
    int rank, size;
    char *buf;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    setvbuf(stdout, NULL, _IOLBF, 0);
    buf = malloc(MAX_SIZE);
    memset(buf, rank, MAX_SIZE);
    for (int a = argc > 1 ? 1 : 0; a < (argc > 1 ? argc : 1); a++) {
        const char *what = argc > 1 ? argv[a] : NULL;
        if ((!what || !strcmp(what, "latency")) && size >= 2)
            latency(rank, buf);
        if ((!what || !strcmp(what, "bandwidth")) && size >= 2)
            bandwidth(rank, buf);
        if (!what || !strcmp(what, "bcast"))
            bcast(rank, buf);
        fflush(stdout);
    }
    free(buf);
    MPI_Finalize();
    return 0;
}
