/* The MPI test program of integration/build-images --mpi, compiled once against OpenMPI
 * (ring-openmpi) and once against MPICH (ring-mpich).
 *
 * Every rank prints where it runs; then a token travels once around the ring of ranks,
 * each rank adding its own number, so rank 0 can check that every rank took part:
 * after the round the token must be 0 + 1 + ... + (N-1).
 * Exit status 1 (after MPI_Abort) when the token comes back wrong. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

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
    /* No rank starts finalizing while another may still need it to answer: MPICH 4.0 over
     * UCX (Debian 12) closes its connections in MPI_Finalize and waits for the other side,
     * which no longer makes progress once it blocks in the PMI barrier of its own
     * MPI_Finalize; without this barrier about every other 3-node run hung there. */
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
