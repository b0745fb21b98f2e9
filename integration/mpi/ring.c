/* The MPI test program of integration/build-images --mpi, compiled once against OpenMPI
 * (ring-openmpi) and once against MPICH (ring-mpich).
 *
 * Every rank prints where it runs; then a token travels once around the ring of ranks,
 * each rank adding its own number, so rank 0 can check that every rank took part:
 * after the round the token must be 0 + 1 + ... + (N-1).
 * Exit status 1 (after MPI_Abort) when the token comes back wrong.
 *
 * RING_FINALIZE_TIMEOUT=S: if MPI_Finalize has not returned after S seconds, say so on
 * stderr and exit with status 3. Debian 12's MPICH 4.0.2 (ch4:ucx) hangs in MPI_Finalize in
 * about half the runs across nodes: it closes its UCX connections there and waits for peers
 * that have already gone on to block in PMI; newer MPICH put a PMI barrier first. */
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void finalize_timeout(int sig)
{
    static const char msg[] = "ring: MPI_Finalize did not return in time\n";
    (void)sig;
    (void)!write(2, msg, sizeof msg - 1);
    _exit(3);
}

int main(int argc, char **argv)
{
    int rank, size, len;
    char host[MPI_MAX_PROCESSOR_NAME];
    long token;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Get_processor_name(host, &len);
    printf("rank %d of %d on %s\n", rank, size, host);
    fflush(stdout);

    if (size > 1) {
        int next = (rank + 1) % size, prev = (rank + size - 1) % size;
        if (rank == 0) {
            token = 0;
            MPI_Send(&token, 1, MPI_LONG, next, 0, MPI_COMM_WORLD);
            MPI_Recv(&token, 1, MPI_LONG, prev, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(&token, 1, MPI_LONG, prev, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            token += rank;
            MPI_Send(&token, 1, MPI_LONG, next, 0, MPI_COMM_WORLD);
        }
    } else {
        token = 0;
    }

    if (rank == 0) {
        long want = (long)size * (size - 1) / 2;
        if (token != want) {
            fprintf(stderr, "ring broken: token %ld, expected %ld\n", token, want);
            fflush(stderr);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        printf("ring complete: %d ranks, token %ld\n", size, token);
        fflush(stdout);
    }
    const char *timeout = getenv("RING_FINALIZE_TIMEOUT");
    if (timeout && atoi(timeout) > 0) {
        signal(SIGALRM, finalize_timeout);
        alarm((unsigned)atoi(timeout));
    }
    MPI_Finalize();
    return 0;
}
